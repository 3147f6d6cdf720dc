"""mmtrain's Hydra config groups; installed as the package data of mmtrain.conf."""
