"""What every stage shares: params.yaml read and validated, one-line errors, the paths and files
that stages hand each other (outputs, the trained model files, evaluate's figures)."""
