import sys

from mmrank.cli import main

sys.exit(main())
