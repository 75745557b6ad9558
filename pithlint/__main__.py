from pithlint.cli import main

main()
