"""Files: orbax checkpoints with atomic writes (:mod:`.checkpoint`), exports other engines read
(:mod:`.export`: HF GPTQ and AutoAWQ GEMM safetensors) and the pinned, checksummed offline assets (:mod:`.assets`)."""
