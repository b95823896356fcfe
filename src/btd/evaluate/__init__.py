"""Evaluation: AUC/EER, the paper's balanced bootstrap, tables and figures."""
