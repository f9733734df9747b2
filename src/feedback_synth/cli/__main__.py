import sys

from feedback_synth.cli.main import main

sys.exit(main())
