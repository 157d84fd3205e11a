"""The foundation every layer uses, below them all: trusted-weights IO and local data, nothing that trains.

``artifacts`` (a model handed from one stage to the next: safetensors + manifest with sha256 and parents),
``checkpoint_io`` (Lightning checkpoints written atomically and read back with ``weights_only=True``), ``assets``
(offline datasets and models, ``python -m foundation.assets prepare``), the local data stores
(``image_store``, ``text_store``, ``wmdp_store``, ``store_meta``) and the hub exporters that write them
(``export_images``, ``export_text``, ``export_wmdp``, ``hub_export``). Imports run one way:
foundation -> ops -> nets/data -> methods -> callbacks -> recipes (``tests/test_layers.py``).
"""
