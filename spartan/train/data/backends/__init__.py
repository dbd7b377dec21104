"""One module per ``data=`` option. Each declares its schema (a dataclass built from
:mod:`spartan.train.data.common`) and ``BACKEND``, a :class:`spartan.train.data.registry.Backend` naming the
function that builds its loaders; :mod:`spartan.train.data.registry` finds every module here. Adding a dataset is
one module here plus ``configs/data/<name>.yaml`` (``defaults: [<name>_schema, _self_]`` and any overrides)."""
