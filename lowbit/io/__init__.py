"""Files: orbax checkpoints with atomic writes (:mod:`.checkpoint`), exports other engines read
(:mod:`.export`: HF GPTQ safetensors) and the pinned, checksummed offline assets (:mod:`.assets`)."""
