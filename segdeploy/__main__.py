"""`python -m segdeploy …` — what torchrun runs: `torchrun --nproc-per-node N -m segdeploy train RECIPE …`."""

from segdeploy.cli import main

main()
