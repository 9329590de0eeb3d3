from flashinfer_cli.cli import main

main()
