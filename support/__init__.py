"""What the tests and the benchmarks share: synthetic DICOM inputs and checkpoints (helpers),
the node and its real peers as processes (node_peers), mutated inputs (fuzz_inputs).

Not installed with the package; run from the repository root.
"""
