"""The demo pipeline: a small real ML comparison on data shipped with scikit-learn."""
