import sys

from metatrain.pipeline.cli import main

sys.exit(main())
