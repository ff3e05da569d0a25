"""Pure loss and weighting functions, separate from trainer plumbing so they can be tested on their own."""
