// Declarations only; see README.md in the parent folder.
#pragma once
