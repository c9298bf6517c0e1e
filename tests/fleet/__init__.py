"""The fleet suite (issue 9): two real PBXs, two gateway processes, one database."""
