import sys

from rlpost.run import main

sys.exit(main())
