"""The whole WSSS pipeline (``wsss.run_pipeline``) and the demo that runs it for the CAM baseline and
CPAL (``baseline_vs_cpal.run_demo``): orchestration over the Ray stages of ``cpal_ray.distributed``,
importing no Ray itself."""
