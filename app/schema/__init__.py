"""Response schema v1 (``v1``), the normalizer that produces it (``normalize``), its
label tables (``labels``) and the compatibility check that guards it (``compat``).

Nothing is re-exported here on purpose: ``python -m app.schema.v1`` regenerates the
committed JSON Schema, and runpy warns when the package has already imported the
module it is asked to run.
"""
