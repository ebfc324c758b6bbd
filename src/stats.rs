//! Statistical tests (being written).
