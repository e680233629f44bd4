from zigzag_mamba.cli import main

raise SystemExit(main())
