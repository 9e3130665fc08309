"""Layer-parallel engines: stages placed on devices, the synthetic-gradient pipeline,
model-parallel and GPipe backprop."""
