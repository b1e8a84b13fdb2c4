"""`python -m cli` is `dicom-node` (and what torchrun runs: `torchrun ... -m cli train ...`)."""
from cli import main

main()
