"""Stage orchestration: one module per DVC stage, called by the stage notebook."""
