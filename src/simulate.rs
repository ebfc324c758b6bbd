//! Monte-Carlo simulation of the kernel's choices (being written).
