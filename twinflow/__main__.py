from twinflow.cli import main

main()
