from dsv4.cli import main
import sys
sys.exit(main())
