"""Files in and out: pipeline files, manifests, atomic writes."""
