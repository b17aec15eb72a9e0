from django.contrib import admin

from gallery.models import Digest, Photo


@admin.register(Photo)
class PhotoAdmin(admin.ModelAdmin):
    list_display = ("title", "size_kb", "uploaded_at", "thumbnailed_at", "receipt_sent_at")
    readonly_fields = ("thumbnail_sha256", "thumbnail_bytes", "thumbnailed_at", "receipt_sent_at")
    actions = ["make_thumbnails"]

    @admin.action(description="Make thumbnails (enqueue on the images queue)")
    def make_thumbnails(self, request, queryset):
        from gallery.jobs import make_thumbnail

        for photo in queryset:
            make_thumbnail.delay(photo.pk)
        self.message_user(request, f"Enqueued {queryset.count()} thumbnail job(s).")


@admin.register(Digest)
class DigestAdmin(admin.ModelAdmin):
    list_display = ("created_at", "photos", "thumbnails")
