"""Images: the sources decoded (sources), the prepared uint8 arrays and the training subset (arrays),
model inputs made on the device (inputs), augmentation (augment)."""
