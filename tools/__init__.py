"""Developer tools that sit beside the library: the visdom server with its offline web assets."""
