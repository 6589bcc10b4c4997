"""CBSA's contract-and-broadcast operator (work in progress: being consolidated into one dispatching package)."""
