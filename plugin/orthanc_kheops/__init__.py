"""Forward every instance Orthanc stores to a KHEOPS album, and share series into switching albums."""
