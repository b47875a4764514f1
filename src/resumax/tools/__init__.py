"""Tools over the library that back the command line: `resumax profile` and `resumax inspect`."""
