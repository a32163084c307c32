"""Text to image in apps: prompt enrichment (:mod:`vats_apps.generation.enrich`) and the
image files a run writes (:mod:`vats_apps.generation.images`)."""
