"""``python -m models.zoo``: write the zoo's models into a folder (see :mod:`models.zoo`)."""

from models.zoo import main

main()
