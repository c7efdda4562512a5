// Numbers for people.

/** Bytes in decimal units: 812.0 MB, 15.2 GB, 1.9 TB. */
export function formatBytes(bytes: number): string {
  const units = ['B', 'kB', 'MB', 'GB', 'TB', 'PB'];
  let i = 0;
  while (i < units.length - 1 && bytes >= 1000 ** (i + 1)) i++;
  return i === 0 ? `${bytes} B` : `${(bytes / 1000 ** i).toFixed(1)} ${units[i]}`;
}
