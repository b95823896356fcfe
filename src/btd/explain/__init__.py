"""The SHAP entropy experiment (paper section 5.3.1): residual CNNs, SHAP attributions, entropy."""
