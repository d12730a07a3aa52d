"""Framework adapters (Hugging Face Trainer, Lightning). Import the submodule you need; each imports its framework."""
