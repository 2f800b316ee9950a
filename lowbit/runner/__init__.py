"""Experiments: YAML configs (:mod:`.config`), the runner that turns a config into ``results/``
(:mod:`.experiment`), run records (:mod:`.records`: versions, device, git SHA, atomic JSON) and the
report generator (:mod:`.paper`)."""
