-- The image a build recorded: set in the same transaction that completes the build, and
-- only by the builder holding the claim, so one build never records two images.
alter table image_builds add column image_id bigint references images (id);
create index image_builds_image_id on image_builds (image_id);
create unique index images_one_per_build on image_builds (image_id) where image_id is not null;
