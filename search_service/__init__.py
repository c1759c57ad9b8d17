"""SearchService: image and prediction search on Elasticsearch or SQLite."""
