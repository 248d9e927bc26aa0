"""The two hypernetworks of METHOD.md 1.4 and 1.6: trees and weights from (preference, budget)."""
