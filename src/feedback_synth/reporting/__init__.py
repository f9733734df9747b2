"""What a person reads or looks at: tables and plots."""
