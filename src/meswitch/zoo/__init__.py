"""The reference expert zoo: the packaged base model and experts fine-tuned from it on real domain text."""
