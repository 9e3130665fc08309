"""Layer-parallel training: any ``Trainer``'s stages placed on devices, the decoupled pipelines
and model-parallel and GPipe backprop, each schedule one SPMD program (``PipelineEngine``)."""
