"""MNIST from local files, the modality transforms T (eq 90), and MAIN / CTRL pairing."""
