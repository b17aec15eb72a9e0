"""A photo gallery, so the demo jobs have something real to read and write."""

from django.db import models


class Photo(models.Model):
    title = models.CharField(max_length=100)
    size_kb = models.PositiveIntegerField(help_text="How much (synthetic) image data to process.")
    uploaded_at = models.DateTimeField(auto_now_add=True)
    thumbnail_sha256 = models.CharField(max_length=64, blank=True)
    thumbnail_bytes = models.PositiveIntegerField(null=True, blank=True)
    thumbnailed_at = models.DateTimeField(null=True, blank=True)
    receipt_sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-uploaded_at"]

    def __str__(self) -> str:
        return self.title


class Digest(models.Model):
    """What the scheduled job writes: a summary of the gallery at that moment."""

    created_at = models.DateTimeField(auto_now_add=True)
    photos = models.PositiveIntegerField()
    thumbnails = models.PositiveIntegerField()

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.created_at:%Y-%m-%d %H:%M:%S}: {self.thumbnails}/{self.photos} thumbnails"
