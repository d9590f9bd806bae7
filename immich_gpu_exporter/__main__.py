"""python -m immich_gpu_exporter"""

from .cli import main

raise SystemExit(main())
