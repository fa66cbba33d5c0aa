"""Framework integrations built on the Monitor: the Hugging Face Trainer callback and the Lightning callback."""
