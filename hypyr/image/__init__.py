"""Guest images: the kernel and initramfs that hypyr boots, and the pieces used to make them."""
