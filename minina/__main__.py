"""`python -m minina COMMAND`: the command line lives in minina.tools.cli."""
from minina.tools.cli import main

if __name__ == "__main__":
    main()
