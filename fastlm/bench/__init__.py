"""`fastlm bench`: one harness (harness.py), one module per benchmark."""
