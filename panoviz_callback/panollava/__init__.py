"""PanoLLaVA (``wooseungw/panollava``) specifics: its checkpoints' layouts, resamplers and view conventions.

Modules:
    views: :func:`~panoviz_callback.panollava.views.panollava_view_settings`, PanoLLaVA's processor
        settings -> ``make_views`` arguments.
"""
